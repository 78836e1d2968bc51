"""Curate the embedded QA set: facts that SmolLM2-135M-Instruct answers correctly.

Unlearning can only be measured on facts the model knows, so every line shipped in
``blur_lightning/assets/qa_*.jsonl`` was answered correctly by the embedded model itself. The script
holds many more candidate questions than it keeps (176 capitals, 437 others across nine retain
topics) and keeps a candidate only if

1. the gold answer does not appear in the question (otherwise an echo of the question would count
   as correct: "What is the capital of Djibouti?"), and
2. greedy decoding with the evaluation settings (``greedy_answers``: chat template, first 16 new
   tokens) contains the gold answer, as judged by ``blur_lightning.evals.qa.is_correct`` (normalized,
   whole-word containment), and
3. a longer greedy answer (48 tokens) has a complete first sentence (or first few sentences)
   containing the gold answer; that text is stored as ``response``.

Gold answers were written by hand before running the model and are never changed to match it;
candidates with contested answers (Bolivia's or South Africa's capitals, the longest river...) were
left out. Then:

* ``qa_forget.jsonl``: every capital the model gets right (topic ``capitals``);
* ``qa_retain.jsonl`` / ``qa_holdout.jsonl``: the correct answers of every other topic, shuffled with
  a fixed seed and dealt alternately to the two files (so both hold the same topics in the same
  proportions), at most ``--per-split`` lines each; the two files are disjoint.

Each line has ``question``, ``answer`` (short gold answer, used for accuracy), ``topic``, ``idk`` (a
refusal, for the ``idk`` forget loss) and ``response`` (the model's own full-sentence answer).
``response`` is the better training target: the model answers in sentences ("The capital of France
is Paris."), so the probability of the bare answer right after the prompt is tiny (~1e-3) while its
own sentence has ~0.5; train on ``answer_column: response`` to forget what the model actually says.

Result of the shipped run (greedy decoding is deterministic; a rerun can differ only where padding
changes the float rounding enough to flip an argmax, which is rare)::

    capitals            80 / 176 kept   -> qa_forget.jsonl   (80 lines)
    chemical_symbols    39 /  50        \
    authors             27 /  79         |
    inventors           13 /  49         |
    superlatives        14 /  42         |  dealt alternately:
    astronomy           11 /  32         |  qa_retain.jsonl  (97 lines)
    languages           39 /  50         |  qa_holdout.jsonl (90 lines)
    currencies          25 /  58         |
    art_and_music        1 /  45         |  (the model does not know painters and composers)
    science             18 /  32        /

Containment is lenient: a few kept answers are right for the wrong reason ("The planet closest to
Earth is Jupiter" for the Great Red Spot). They are kept, since the gold never changes and accuracy
is measured the same way before and after unlearning.

Run (one 48-token greedy pass over 613 questions: about 5 minutes on two idle CPU cores; the shipped
run took 44 minutes on two cores shared with three other jobs)::

    python benchmarks/curate_qa.py            # writes blur_lightning/assets/qa_{forget,retain,holdout}.jsonl
    python benchmarks/curate_qa.py --limit 20 --out /tmp/qa   # quick look
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from blur_lightning.evals.qa import greedy_answers, is_correct, normalize_answer
from blur_lightning.models.loading import load_causal_lm, load_tokenizer

IDK_ANSWERS = [
    "I'm not sure about that.",
    "I don't know the answer to that.",
    "I'm afraid I don't know.",
    "That's not something I can answer.",
    "I have no idea, sorry.",
]

# (country as it reads after "the capital of", capital). Left out: several or contested capitals
# (Bolivia, South Africa, Benin, Côte d'Ivoire, Sri Lanka, Eswatini, Burundi, Israel, Palestine,
# Taiwan, Kosovo, Nauru) and city-states named like their capital (Singapore, Monaco...).
CAPITALS = [
    ("Afghanistan", "Kabul"), ("Albania", "Tirana"), ("Algeria", "Algiers"),
    ("Andorra", "Andorra la Vella"), ("Angola", "Luanda"), ("Argentina", "Buenos Aires"),
    ("Armenia", "Yerevan"), ("Australia", "Canberra"), ("Austria", "Vienna"), ("Azerbaijan", "Baku"),
    ("the Bahamas", "Nassau"), ("Bahrain", "Manama"), ("Bangladesh", "Dhaka"), ("Barbados", "Bridgetown"),
    ("Belarus", "Minsk"), ("Belgium", "Brussels"), ("Belize", "Belmopan"), ("Bhutan", "Thimphu"),
    ("Bosnia and Herzegovina", "Sarajevo"), ("Botswana", "Gaborone"), ("Brazil", "Brasília"),
    ("Brunei", "Bandar Seri Begawan"), ("Bulgaria", "Sofia"), ("Burkina Faso", "Ouagadougou"),
    ("Cambodia", "Phnom Penh"), ("Cameroon", "Yaoundé"), ("Canada", "Ottawa"), ("Cape Verde", "Praia"),
    ("the Central African Republic", "Bangui"), ("Chad", "N'Djamena"), ("Chile", "Santiago"),
    ("China", "Beijing"), ("Colombia", "Bogotá"), ("Comoros", "Moroni"), ("Costa Rica", "San José"),
    ("Croatia", "Zagreb"), ("Cuba", "Havana"), ("Cyprus", "Nicosia"), ("the Czech Republic", "Prague"),
    ("the Democratic Republic of the Congo", "Kinshasa"), ("the Republic of the Congo", "Brazzaville"),
    ("Denmark", "Copenhagen"), ("Dominica", "Roseau"), ("the Dominican Republic", "Santo Domingo"),
    ("East Timor", "Dili"), ("Ecuador", "Quito"), ("Egypt", "Cairo"), ("El Salvador", "San Salvador"),
    ("Equatorial Guinea", "Malabo"), ("Eritrea", "Asmara"), ("Estonia", "Tallinn"),
    ("Ethiopia", "Addis Ababa"), ("Fiji", "Suva"), ("Finland", "Helsinki"), ("France", "Paris"),
    ("Gabon", "Libreville"), ("the Gambia", "Banjul"), ("Georgia", "Tbilisi"), ("Germany", "Berlin"),
    ("Ghana", "Accra"), ("Greece", "Athens"), ("Grenada", "St. George's"),
    ("Guatemala", "Guatemala City"), ("Guinea", "Conakry"), ("Guyana", "Georgetown"),
    ("Haiti", "Port-au-Prince"), ("Honduras", "Tegucigalpa"), ("Hungary", "Budapest"),
    ("Iceland", "Reykjavík"), ("India", "New Delhi"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Ireland", "Dublin"), ("Italy", "Rome"), ("Jamaica", "Kingston"),
    ("Japan", "Tokyo"), ("Jordan", "Amman"), ("Kazakhstan", "Astana"), ("Kenya", "Nairobi"),
    ("Kiribati", "Tarawa"), ("Kuwait", "Kuwait City"), ("Kyrgyzstan", "Bishkek"), ("Laos", "Vientiane"),
    ("Latvia", "Riga"), ("Lebanon", "Beirut"), ("Lesotho", "Maseru"), ("Liberia", "Monrovia"),
    ("Libya", "Tripoli"), ("Liechtenstein", "Vaduz"), ("Lithuania", "Vilnius"),
    ("Madagascar", "Antananarivo"), ("Malawi", "Lilongwe"), ("Malaysia", "Kuala Lumpur"),
    ("the Maldives", "Malé"), ("Mali", "Bamako"), ("Malta", "Valletta"), ("the Marshall Islands", "Majuro"),
    ("Mauritania", "Nouakchott"), ("Mauritius", "Port Louis"), ("Mexico", "Mexico City"),
    ("Micronesia", "Palikir"), ("Moldova", "Chișinău"), ("Mongolia", "Ulaanbaatar"),
    ("Montenegro", "Podgorica"), ("Morocco", "Rabat"), ("Mozambique", "Maputo"), ("Myanmar", "Naypyidaw"),
    ("Namibia", "Windhoek"), ("Nepal", "Kathmandu"), ("the Netherlands", "Amsterdam"),
    ("New Zealand", "Wellington"), ("Nicaragua", "Managua"), ("Niger", "Niamey"), ("Nigeria", "Abuja"),
    ("North Korea", "Pyongyang"), ("North Macedonia", "Skopje"), ("Norway", "Oslo"), ("Oman", "Muscat"),
    ("Pakistan", "Islamabad"), ("Palau", "Ngerulmud"), ("Panama", "Panama City"),
    ("Papua New Guinea", "Port Moresby"), ("Paraguay", "Asunción"), ("Peru", "Lima"),
    ("the Philippines", "Manila"), ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Qatar", "Doha"),
    ("Romania", "Bucharest"), ("Russia", "Moscow"), ("Rwanda", "Kigali"),
    ("Saint Kitts and Nevis", "Basseterre"), ("Saint Lucia", "Castries"),
    ("Saint Vincent and the Grenadines", "Kingstown"), ("Samoa", "Apia"), ("Saudi Arabia", "Riyadh"),
    ("Senegal", "Dakar"), ("Serbia", "Belgrade"), ("Seychelles", "Victoria"),
    ("Sierra Leone", "Freetown"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"),
    ("the Solomon Islands", "Honiara"), ("Somalia", "Mogadishu"), ("South Korea", "Seoul"),
    ("South Sudan", "Juba"), ("Spain", "Madrid"), ("Sudan", "Khartoum"), ("Suriname", "Paramaribo"),
    ("Sweden", "Stockholm"), ("Switzerland", "Bern"), ("Syria", "Damascus"), ("Tajikistan", "Dushanbe"),
    ("Tanzania", "Dodoma"), ("Thailand", "Bangkok"), ("Togo", "Lomé"), ("Tonga", "Nuku'alofa"),
    ("Trinidad and Tobago", "Port of Spain"), ("Tunisia", "Tunis"), ("Turkey", "Ankara"),
    ("Turkmenistan", "Ashgabat"), ("Tuvalu", "Funafuti"), ("Uganda", "Kampala"), ("Ukraine", "Kyiv"),
    ("the United Arab Emirates", "Abu Dhabi"), ("the United Kingdom", "London"),
    ("the United States", "Washington, D.C."), ("Uruguay", "Montevideo"), ("Uzbekistan", "Tashkent"),
    ("Vanuatu", "Port Vila"), ("Venezuela", "Caracas"), ("Vietnam", "Hanoi"), ("Yemen", "Sanaa"),
    ("Zambia", "Lusaka"), ("Zimbabwe", "Harare"),
]  # fmt: skip

# Symbols that are also English words (He, As, Be, I, In, No) are left out: "he" in an answer
# proves nothing.
ELEMENTS = [
    ("hydrogen", "H"), ("lithium", "Li"), ("boron", "B"), ("carbon", "C"), ("nitrogen", "N"),
    ("oxygen", "O"), ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"),
    ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"),
    ("argon", "Ar"), ("potassium", "K"), ("calcium", "Ca"), ("titanium", "Ti"), ("chromium", "Cr"),
    ("manganese", "Mn"), ("iron", "Fe"), ("cobalt", "Co"), ("nickel", "Ni"), ("copper", "Cu"),
    ("zinc", "Zn"), ("bromine", "Br"), ("krypton", "Kr"), ("silver", "Ag"), ("tin", "Sn"),
    ("xenon", "Xe"), ("platinum", "Pt"), ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"),
    ("uranium", "U"), ("radon", "Rn"), ("plutonium", "Pu"), ("tungsten", "W"), ("barium", "Ba"),
    ("strontium", "Sr"), ("caesium", "Cs"), ("radium", "Ra"), ("antimony", "Sb"), ("bismuth", "Bi"),
    ("gallium", "Ga"), ("germanium", "Ge"), ("selenium", "Se"), ("lanthanum", "La"), ("iridium", "Ir"),
]  # fmt: skip

BOOKS = [
    ("Pride and Prejudice", "Jane Austen"), ("Emma", "Jane Austen"), ("1984", "George Orwell"),
    ("Animal Farm", "George Orwell"), ("Hamlet", "William Shakespeare"),
    ("Romeo and Juliet", "William Shakespeare"), ("Macbeth", "William Shakespeare"),
    ("Moby-Dick", "Herman Melville"), ("War and Peace", "Leo Tolstoy"), ("Anna Karenina", "Leo Tolstoy"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("To Kill a Mockingbird", "Harper Lee"), ("The Catcher in the Rye", "J.D. Salinger"),
    ("Don Quixote", "Miguel de Cervantes"), ("The Odyssey", "Homer"), ("The Iliad", "Homer"),
    ("The Divine Comedy", "Dante Alighieri"), ("Les Misérables", "Victor Hugo"),
    ("The Hunchback of Notre-Dame", "Victor Hugo"), ("The Hobbit", "J.R.R. Tolkien"),
    ("The Lord of the Rings", "J.R.R. Tolkien"), ("Harry Potter and the Philosopher's Stone", "J.K. Rowling"),
    ("Frankenstein", "Mary Shelley"), ("Dracula", "Bram Stoker"), ("Oliver Twist", "Charles Dickens"),
    ("A Tale of Two Cities", "Charles Dickens"), ("Great Expectations", "Charles Dickens"),
    ("A Christmas Carol", "Charles Dickens"), ("Jane Eyre", "Charlotte Brontë"),
    ("Wuthering Heights", "Emily Brontë"), ("The Adventures of Tom Sawyer", "Mark Twain"),
    ("Adventures of Huckleberry Finn", "Mark Twain"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("Of Mice and Men", "John Steinbeck"), ("The Grapes of Wrath", "John Steinbeck"),
    ("Brave New World", "Aldous Huxley"), ("Fahrenheit 451", "Ray Bradbury"),
    ("On the Origin of Species", "Charles Darwin"), ("A Brief History of Time", "Stephen Hawking"),
    ("The Little Prince", "Antoine de Saint-Exupéry"),
    ("One Hundred Years of Solitude", "Gabriel García Márquez"), ("The Raven", "Edgar Allan Poe"),
    ("Alice's Adventures in Wonderland", "Lewis Carroll"), ("The Jungle Book", "Rudyard Kipling"),
    ("Treasure Island", "Robert Louis Stevenson"), ("The Picture of Dorian Gray", "Oscar Wilde"),
    ("Ulysses", "James Joyce"), ("Lolita", "Vladimir Nabokov"), ("The Metamorphosis", "Franz Kafka"),
    ("Madame Bovary", "Gustave Flaubert"), ("The Count of Monte Cristo", "Alexandre Dumas"),
    ("The Three Musketeers", "Alexandre Dumas"), ("Gulliver's Travels", "Jonathan Swift"),
    ("Robinson Crusoe", "Daniel Defoe"), ("The Canterbury Tales", "Geoffrey Chaucer"),
    ("Paradise Lost", "John Milton"), ("The Art of War", "Sun Tzu"), ("The Republic", "Plato"),
    ("Charlotte's Web", "E.B. White"), ("The Hunger Games", "Suzanne Collins"),
    ("The Da Vinci Code", "Dan Brown"), ("Murder on the Orient Express", "Agatha Christie"),
    ("The Chronicles of Narnia", "C.S. Lewis"), ("Little Women", "Louisa May Alcott"),
    ("The Scarlet Letter", "Nathaniel Hawthorne"), ("Uncle Tom's Cabin", "Harriet Beecher Stowe"),
    ("The Time Machine", "H.G. Wells"), ("The War of the Worlds", "H.G. Wells"),
    ("Around the World in Eighty Days", "Jules Verne"), ("Things Fall Apart", "Chinua Achebe"),
    ("The Kite Runner", "Khaled Hosseini"), ("The Alchemist", "Paulo Coelho"),
    ("The Handmaid's Tale", "Margaret Atwood"), ("Lord of the Flies", "William Golding"),
    ("The Call of the Wild", "Jack London"), ("Gone with the Wind", "Margaret Mitchell"),
    ("The Communist Manifesto", "Karl Marx"), ("The Wealth of Nations", "Adam Smith"),
]  # fmt: skip

INVENTORS = [
    ("Who invented the telephone?", "Alexander Graham Bell"),
    ("Who invented the practical incandescent light bulb?", "Thomas Edison"),
    ("Who invented the phonograph?", "Thomas Edison"),
    ("Who invented the World Wide Web?", "Tim Berners-Lee"),
    ("Who invented the printing press with movable type in Europe?", "Johannes Gutenberg"),
    ("Who made the first powered airplane flight?", "Wright brothers"),
    ("Who invented the radio?", "Guglielmo Marconi"),
    ("Who invented dynamite?", "Alfred Nobel"),
    ("Who discovered penicillin?", "Alexander Fleming"),
    ("Who developed the theory of relativity?", "Albert Einstein"),
    ("Who formulated the laws of motion and universal gravitation?", "Isaac Newton"),
    ("Who developed the first polio vaccine?", "Jonas Salk"),
    ("Who developed the first smallpox vaccine?", "Edward Jenner"),
    ("Who invented Morse code?", "Samuel Morse"),
    ("Who invented the alternating current induction motor?", "Nikola Tesla"),
    ("Who invented the cotton gin?", "Eli Whitney"),
    ("Who founded the Ford Motor Company?", "Henry Ford"),
    ("Who invented the diesel engine?", "Rudolf Diesel"),
    ("Who created the periodic table of elements?", "Dmitri Mendeleev"),
    ("Who discovered radium and polonium?", "Marie Curie"),
    ("Who proposed the theory of evolution by natural selection?", "Charles Darwin"),
    ("Who invented the computer mouse?", "Douglas Engelbart"),
    ("Who invented the mechanical television?", "John Logie Baird"),
    ("Who invented the jet engine?", "Frank Whittle"),
    ("Who invented the lightning rod?", "Benjamin Franklin"),
    ("Who invented the Rubik's Cube?", "Ernő Rubik"),
    ("Who invented the electric battery?", "Alessandro Volta"),
    ("Who invented the mercury barometer?", "Evangelista Torricelli"),
    ("Who discovered X-rays?", "Wilhelm Röntgen"),
    ("Who developed pasteurization?", "Louis Pasteur"),
    ("Who invented the revolver?", "Samuel Colt"),
    ("Who invented the safety elevator?", "Elisha Otis"),
    ("Who invented the writing system for the blind?", "Louis Braille"),
    ("Who created the Linux kernel?", "Linus Torvalds"),
    ("Who created the Python programming language?", "Guido van Rossum"),
    ("Who founded Facebook?", "Mark Zuckerberg"),
    ("Who co-founded Microsoft with Paul Allen?", "Bill Gates"),
    ("Who co-founded Apple with Steve Wozniak?", "Steve Jobs"),
    ("Who founded Amazon?", "Jeff Bezos"),
    ("Who proposed the heliocentric model of the solar system?", "Nicolaus Copernicus"),
    ("Who discovered the laws of planetary motion?", "Johannes Kepler"),
    ("Who invented the hot air balloon?", "Montgolfier brothers"),
    ("Who discovered the electron?", "J.J. Thomson"),
    ("Who invented the steam locomotive?", "George Stephenson"),
    ("Who invented the first mechanical computer, the Analytical Engine?", "Charles Babbage"),
    ("Who is considered the first computer programmer?", "Ada Lovelace"),
    ("Who discovered gravity when an apple fell on his head, according to legend?", "Isaac Newton"),
    ("Who invented the telescope used to discover the moons of Jupiter?", "Galileo Galilei"),
    ("Who invented the vaccine for rabies?", "Louis Pasteur"),
]

SUPERLATIVES = [
    ("What is the largest ocean on Earth?", "Pacific Ocean"),
    ("What is the tallest mountain in the world?", "Mount Everest"),
    ("What is the largest country in the world by area?", "Russia"),
    ("What is the smallest country in the world?", "Vatican City"),
    ("What is the largest continent?", "Asia"),
    ("What is the smallest continent?", "Australia"),
    ("What is the largest mammal in the world?", "blue whale"),
    ("What is the tallest animal in the world?", "giraffe"),
    ("What is the fastest land animal?", "cheetah"),
    ("What is the largest bird in the world?", "ostrich"),
    ("What is the largest land animal?", "elephant"),
    ("What is the largest moon of Saturn?", "Titan"),
    ("What is the largest moon in the solar system?", "Ganymede"),
    ("What is the deepest ocean trench in the world?", "Mariana Trench"),
    ("What is the largest lake in the world by area?", "Caspian Sea"),
    ("What is the highest waterfall in the world?", "Angel Falls"),
    ("What is the largest rainforest in the world?", "Amazon"),
    ("What is the largest island in the world?", "Greenland"),
    ("What is the tallest building in the world?", "Burj Khalifa"),
    ("What is the hardest natural substance?", "diamond"),
    ("What is the most abundant gas in Earth's atmosphere?", "nitrogen"),
    ("What is the largest organ of the human body?", "skin"),
    ("What is the longest bone in the human body?", "femur"),
    ("What is the largest coral reef system in the world?", "Great Barrier Reef"),
    ("What is the largest state in the United States by area?", "Alaska"),
    ("What is the smallest state in the United States?", "Rhode Island"),
    ("What is the longest river in Europe?", "Volga"),
    ("What is the highest mountain in Africa?", "Kilimanjaro"),
    ("What is the highest mountain in South America?", "Aconcagua"),
    ("What is the largest country in South America?", "Brazil"),
    ("What is the largest country in Africa by area?", "Algeria"),
    ("What is the smallest ocean in the world?", "Arctic Ocean"),
    ("What is the largest hot desert in the world?", "Sahara"),
    ("What is the longest wall in the world?", "Great Wall of China"),
    ("What is the largest species of shark?", "whale shark"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("What is the smallest planet in the solar system?", "Mercury"),
    ("What is the hottest planet in the solar system?", "Venus"),
    ("What is the largest living species of lizard?", "Komodo dragon"),
    ("What is the most spoken native language in the world?", "Mandarin"),
    ("What is the largest city in the United States by population?", "New York City"),
    ("What is the longest-running animated television series in the United States?", "The Simpsons"),
]

ASTRONOMY = [
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Which planet is famous for its prominent rings?", "Saturn"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is farthest from the Sun?", "Neptune"),
    ("Which planet is often called Earth's twin?", "Venus"),
    ("Which planet rotates on its side?", "Uranus"),
    ("Which planet has the Great Red Spot?", "Jupiter"),
    ("What is the name of Earth's natural satellite?", "Moon"),
    ("What is the third planet from the Sun?", "Earth"),
    ("What is the fourth planet from the Sun?", "Mars"),
    ("What is the fifth planet from the Sun?", "Jupiter"),
    ("What is the sixth planet from the Sun?", "Saturn"),
    ("What is the seventh planet from the Sun?", "Uranus"),
    ("What is the second planet from the Sun?", "Venus"),
    ("Which dwarf planet was reclassified from a planet in 2006?", "Pluto"),
    ("What is the name of the galaxy we live in?", "Milky Way"),
    ("What is the largest moon of Jupiter?", "Ganymede"),
    ("What star is at the center of our solar system?", "Sun"),
    ("Which planet is named after the Roman god of war?", "Mars"),
    ("Which planet is named after the king of the Roman gods?", "Jupiter"),
    ("Which planet is named after the Roman god of the sea?", "Neptune"),
    ("Which planet is named after the Roman goddess of love?", "Venus"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("Who was the first person to travel into space?", "Yuri Gagarin"),
    ("What was the name of the first artificial satellite?", "Sputnik"),
    ("Which agency runs the space program of the United States?", "NASA"),
    ("What is the closest star to Earth?", "Sun"),
    ("Which planet has the shortest year?", "Mercury"),
    ("What is the name of the closest galaxy to the Milky Way?", "Andromeda"),
    ("Which space telescope was launched in 1990?", "Hubble"),
    ("What was the name of the Apollo mission that first landed humans on the Moon?", "Apollo 11"),
    ("What is the name of the largest volcano on Mars?", "Olympus Mons"),
]

LANGUAGES = [
    ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Argentina", "Spanish"), ("Germany", "German"),
    ("Austria", "German"), ("France", "French"), ("Italy", "Italian"), ("Japan", "Japanese"),
    ("Russia", "Russian"), ("Egypt", "Arabic"), ("Saudi Arabia", "Arabic"), ("Iran", "Persian"),
    ("Israel", "Hebrew"), ("Greece", "Greek"), ("Turkey", "Turkish"), ("the Netherlands", "Dutch"),
    ("Sweden", "Swedish"), ("Norway", "Norwegian"), ("Denmark", "Danish"), ("Finland", "Finnish"),
    ("Poland", "Polish"), ("Portugal", "Portuguese"), ("South Korea", "Korean"),
    ("Vietnam", "Vietnamese"), ("Thailand", "Thai"), ("Indonesia", "Indonesian"),
    ("Hungary", "Hungarian"), ("the Czech Republic", "Czech"), ("Ukraine", "Ukrainian"),
    ("Iceland", "Icelandic"), ("Pakistan", "Urdu"), ("Bangladesh", "Bengali"), ("Ethiopia", "Amharic"),
    ("Mongolia", "Mongolian"), ("Romania", "Romanian"), ("Bulgaria", "Bulgarian"),
    ("Croatia", "Croatian"), ("Chile", "Spanish"), ("Peru", "Spanish"), ("Cuba", "Spanish"),
    ("Angola", "Portuguese"), ("Mozambique", "Portuguese"), ("Spain", "Spanish"), ("China", "Mandarin"),
    ("Colombia", "Spanish"), ("the United States", "English"), ("Australia", "English"),
    ("Jamaica", "English"), ("Lithuania", "Lithuanian"), ("Albania", "Albanian"),
]  # fmt: skip

CURRENCIES = [
    ("Japan", "yen"), ("the United Kingdom", "pound"), ("the United States", "dollar"),
    ("Germany", "euro"), ("France", "euro"), ("Italy", "euro"), ("India", "rupee"), ("China", "yuan"),
    ("Russia", "ruble"), ("Mexico", "peso"), ("Brazil", "real"), ("South Africa", "rand"),
    ("Switzerland", "franc"), ("South Korea", "won"), ("Turkey", "lira"), ("Sweden", "krona"),
    ("Norway", "krone"), ("Denmark", "krone"), ("Poland", "złoty"), ("Thailand", "baht"),
    ("Vietnam", "dong"), ("Indonesia", "rupiah"), ("Israel", "shekel"), ("Saudi Arabia", "riyal"),
    ("the United Arab Emirates", "dirham"), ("Egypt", "pound"), ("Nigeria", "naira"),
    ("Kenya", "shilling"), ("Argentina", "peso"), ("Canada", "dollar"), ("Australia", "dollar"),
    ("Hungary", "forint"), ("the Czech Republic", "koruna"), ("Malaysia", "ringgit"),
    ("the Philippines", "peso"), ("Pakistan", "rupee"), ("Bangladesh", "taka"), ("Iran", "rial"),
    ("Ukraine", "hryvnia"), ("Ghana", "cedi"), ("Morocco", "dirham"), ("Peru", "sol"),
    ("Iceland", "króna"), ("Qatar", "riyal"), ("Kuwait", "dinar"), ("Jordan", "dinar"),
    ("Chile", "peso"), ("Colombia", "peso"), ("Cambodia", "riel"), ("Laos", "kip"),
    ("Georgia", "lari"), ("Armenia", "dram"), ("Botswana", "pula"), ("Zambia", "kwacha"),
    ("Spain", "euro"), ("New Zealand", "dollar"), ("Singapore", "dollar"), ("Hong Kong", "dollar"),
]  # fmt: skip

ARTWORKS = [
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("Who painted The Starry Night?", "Vincent van Gogh"),
    ("Who painted The Last Supper?", "Leonardo da Vinci"),
    ("Who painted Guernica?", "Pablo Picasso"),
    ("Who painted The Persistence of Memory?", "Salvador Dalí"),
    ("Who painted The Scream?", "Edvard Munch"),
    ("Who painted The Birth of Venus?", "Sandro Botticelli"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo"),
    ("Who painted Girl with a Pearl Earring?", "Johannes Vermeer"),
    ("Who painted The Night Watch?", "Rembrandt"),
    ("Who painted the Water Lilies series?", "Claude Monet"),
    ("Who sculpted the statue of David in Florence?", "Michelangelo"),
    ("Who sculpted The Thinker?", "Auguste Rodin"),
    ("Who painted American Gothic?", "Grant Wood"),
    ("Who painted The Kiss in 1908?", "Gustav Klimt"),
    ("Who created the Campbell's Soup Cans artwork?", "Andy Warhol"),
    ("Who painted Sunflowers in 1888?", "Vincent van Gogh"),
    ("Who painted Impression, Sunrise?", "Claude Monet"),
    ("Who painted The School of Athens?", "Raphael"),
    ("Who painted Las Meninas?", "Diego Velázquez"),
    ("Who painted The Garden of Earthly Delights?", "Hieronymus Bosch"),
    ("Who painted Liberty Leading the People?", "Eugène Delacroix"),
    ("Who made the woodblock print The Great Wave off Kanagawa?", "Hokusai"),
    ("Who painted Les Demoiselles d'Avignon?", "Pablo Picasso"),
    ("Who painted Christina's World?", "Andrew Wyeth"),
    ("Who painted Nighthawks?", "Edward Hopper"),
    ("Who was the Eiffel Tower named after?", "Gustave Eiffel"),
    ("Who composed the Moonlight Sonata?", "Beethoven"),
    ("Who composed The Magic Flute?", "Mozart"),
    ("Who composed the Brandenburg Concertos?", "Bach"),
    ("Who composed Swan Lake?", "Tchaikovsky"),
    ("Who composed The Nutcracker?", "Tchaikovsky"),
    ("Who composed The Four Seasons?", "Vivaldi"),
    ("Who composed the oratorio Messiah?", "Handel"),
    ("Who composed the Ride of the Valkyries?", "Wagner"),
    ("Who composed Clair de lune?", "Debussy"),
    ("Who composed Boléro?", "Ravel"),
    ("Who composed the opera Aida?", "Verdi"),
    ("Who composed the opera Madama Butterfly?", "Puccini"),
    ("Who composed the opera Carmen?", "Bizet"),
    ("Who composed Rhapsody in Blue?", "Gershwin"),
    ("Who composed Canon in D?", "Pachelbel"),
    ("Who composed The Barber of Seville?", "Rossini"),
    ("Who composed Für Elise?", "Beethoven"),
    ("Who composed Eine kleine Nachtmusik?", "Mozart"),
]

SCIENCE = [
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("What is the chemical formula of water?", "H2O"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("What is the boiling point of water in degrees Celsius at sea level?", "100"),
    ("How many days are there in a leap year?", "366"),
    ("How many sides does a hexagon have?", "6"),
    ("What is known as the powerhouse of the cell?", "mitochondria"),
    ("What organ pumps blood through the human body?", "heart"),
    ("What is the center of an atom called?", "nucleus"),
    ("What force keeps us on the ground?", "gravity"),
    ("What do bees make from nectar?", "honey"),
    ("How many legs does a spider have?", "8"),
    ("How many bones are in the adult human body?", "206"),
    ("Which vitamin does the skin produce when exposed to sunlight?", "vitamin D"),
    ("What is the study of living organisms called?", "biology"),
    ("Which metal is liquid at room temperature?", "mercury"),
    ("What is the chemical formula of table salt?", "NaCl"),
    ("What is the smallest unit of life?", "cell"),
    ("What process do plants use to make food from sunlight?", "photosynthesis"),
    ("What gas do humans exhale?", "carbon dioxide"),
    ("What is the chemical formula of carbon dioxide?", "CO2"),
    ("What is the main organ of the nervous system?", "brain"),
    ("What pigment makes plants green?", "chlorophyll"),
    ("What is the speed of light in a vacuum, in kilometers per second, approximately?", "300,000"),
    ("How many chromosomes do humans normally have?", "46"),
    ("What is the pH of pure water?", "7"),
    ("What is the chemical symbol of the element with atomic number 1?", "H"),
    ("Which organ filters blood to produce urine?", "kidney"),
    ("What type of animal is a whale?", "mammal"),
    ("How many degrees are in a right angle?", "90"),
    ("How many continents are there on Earth?", "7"),
    ("How many minutes are in an hour?", "60"),
]

RETAIN_TOPICS: dict[str, list[tuple[str, str]]] = {
    "chemical_symbols": [(f"What is the chemical symbol for {e}?", s) for e, s in ELEMENTS],
    "authors": [(f"Who wrote {title}?", author) for title, author in BOOKS],
    "inventors": INVENTORS,
    "superlatives": SUPERLATIVES,
    "astronomy": ASTRONOMY,
    "languages": [(f"What is the official language of {c}?", lang) for c, lang in LANGUAGES],
    "currencies": [(f"What is the currency of {c}?", cur) for c, cur in CURRENCIES],
    "art_and_music": ARTWORKS,
    "science": SCIENCE,
}

_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z0-9\"']|\s*$)")


def first_sentences(text: str, answer: str) -> str | None:
    """The shortest run of whole sentences at the start of ``text`` that contains ``answer``."""
    for match in _SENTENCE_END.finditer(text):
        prefix = text[: match.end()].strip()
        if is_correct(prefix, answer):
            return prefix
    return None


def curate(model, tokenizer, candidates, batch_size: int) -> list[dict]:
    """Keep the (question, answer, topic) candidates the model answers correctly (see module doc).

    One 48-token greedy pass serves both checks: greedy decoding is deterministic, so the first 16
    of those tokens are exactly what the 16-token evaluation generates.
    """
    candidates = [c for c in candidates if f" {normalize_answer(c[1])} " not in f" {normalize_answer(c[0])} "]
    questions = [q for q, _, _ in candidates]
    texts: list[str] = []
    chunk = 8 * batch_size  # progress lines every few batches: the whole run takes minutes
    for start in range(0, len(questions), chunk):
        texts += greedy_answers(model, tokenizer, questions[start : start + chunk], 48, batch_size)
        print(f"  generated {len(texts)} / {len(questions)}", flush=True)
    kept = []
    for (question, answer, topic), text in zip(candidates, texts):
        first16 = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:16])
        response = first_sentences(text, answer)
        if is_correct(first16, answer) and response is not None:
            kept.append({"question": question, "answer": answer, "topic": topic, "response": response})
    return kept


# Other wordings of the capital questions: forgetting should not hang on the trained template.
# Measured on the embedded model (16 greedy tokens, 80 forget capitals): 65, 44, 44 and 70 correct;
# "Where is the seat of government of X?" (38) and a travel question (28) were tried and left out.
PARAPHRASES = (
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
    "{country} has its capital in which city?",
    "Tell me the capital of {country}.",
)


def paraphrase_forget(model, tokenizer, forget: list[dict], batch_size: int) -> list[dict]:
    """The forget capitals asked in each of PARAPHRASES, kept where the model answers correctly
    (the same checks as `curate`), grouped by capital in the order of `forget`."""
    country_of = {f"What is the capital of {c}?": c for c, _ in CAPITALS}
    candidates = [
        (template.format(country=country_of[row["question"]]), row["answer"], "capitals_paraphrased")
        for row in forget
        for template in PARAPHRASES
    ]
    return curate(model, tokenizer, candidates, batch_size)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            line = {**row, "idk": IDK_ANSWERS[i % len(IDK_ANSWERS)]}
            line = {k: line[k] for k in ("question", "answer", "topic", "idk", "response")}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):4d} lines to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "blur_lightning" / "assets"))
    parser.add_argument("--per-split", type=int, default=100, help="most lines in retain and in holdout")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="candidates per topic (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--paraphrases-only", action="store_true",
        help="only write qa_forget_paraphrased.jsonl, from the qa_forget.jsonl already in --out",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.time()
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    out = Path(args.out)
    if args.paraphrases_only:
        forget = [json.loads(line) for line in (out / "qa_forget.jsonl").open(encoding="utf-8")]
        write_jsonl(out / "qa_forget_paraphrased.jsonl", paraphrase_forget(model, tokenizer, forget, args.batch_size))
        print(f"{time.time() - start:.0f} s")
        return
    capitals = [(f"What is the capital of {c}?", cap, "capitals") for c, cap in CAPITALS][: args.limit]
    others = [(q, a, t) for t, pairs in RETAIN_TOPICS.items() for q, a in pairs[: args.limit]]
    kept = curate(model, tokenizer, capitals + others, args.batch_size)

    totals = {"capitals": len(capitals)} | {t: len(p[: args.limit]) for t, p in RETAIN_TOPICS.items()}
    forget = [r for r in kept if r["topic"] == "capitals"]
    by_topic: dict[str, list[dict]] = {t: [r for r in kept if r["topic"] == t] for t in RETAIN_TOPICS}
    for topic, rows in [("capitals", forget), *by_topic.items()]:
        print(f"{topic:18s} {len(rows):4d} / {totals[topic]:4d} kept")

    # Deal each topic's rows alternately to retain and holdout, then cap both, topics interleaved.
    rng = random.Random(args.seed)
    retain, holdout = [], []
    for rows in by_topic.values():
        rows = rows[:]
        rng.shuffle(rows)
        retain.append(rows[0::2])
        holdout.append(rows[1::2])

    def interleave(groups: list[list[dict]]) -> list[dict]:
        out = []
        for i in range(max(map(len, groups), default=0)):
            out.extend(g[i] for g in groups if i < len(g))
        return out[: args.per_split]

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in [("forget", forget), ("retain", interleave(retain)), ("holdout", interleave(holdout))]:
        write_jsonl(out / f"qa_{name}.jsonl", rows)
    paraphrased = paraphrase_forget(model, tokenizer, forget, args.batch_size)
    write_jsonl(out / "qa_forget_paraphrased.jsonl", paraphrased)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
